//! The decision for one request: is the image present, does the policy need the registry, may
//! this request have the cached copy (the credential rule), or must it be pulled. The node's
//! credentials are looked up only on the paths that need the registry or the request's
//! fingerprint; a warm hit of a public image never runs a credential helper.

use std::sync::Arc;

use tracing::warn;

use super::retry::retry;
use super::{Action, Outcome, PullContext, PullError, Puller};
use crate::credentials::SecretKind;
use crate::policy::{self, Decision, PullPolicy};
use crate::registry::{RegistryError, RegistryErrorKind};
use crate::runtime::RuntimeImage;

impl Puller {
    /// Decides and acts on one request.
    pub(super) async fn decide_and_pull(
        &self,
        ask: &PullContext<'_>,
        policy: PullPolicy,
    ) -> Result<Outcome, PullError> {
        let image = ask.image;
        let name = image.to_string();
        let core = &self.core;
        let present = match core.cache.recall(&name) {
            Some(img) => Some(img),
            None => {
                let found = retry(
                    core.settings.retries,
                    core.settings.backoff,
                    "look up",
                    |_| {},
                    || core.runtime.image_status(&name),
                )
                .await
                .map_err(|source| PullError::Runtime {
                    image: name.clone(),
                    what: "look up",
                    source,
                })?;
                if let Some(img) = &found {
                    core.cache.remember(img);
                }
                found
            }
        };
        let cached = |image: RuntimeImage, verified: bool| Outcome {
            image,
            action: Action::Cached,
            verified,
            stale: false,
            measured: None,
            settle: None,
        };
        match policy::decide(policy, image, present) {
            Decision::NotPresent => Err(PullError::NotPresent {
                image: name,
                policy,
            }),
            Decision::Pull => self.pull(ask).await,
            Decision::Resolve(cached_image) => {
                let creds = self.credentials_of(ask).await?;
                // An OAuth2 refresh token is exchanged by the runtime, not by cimage's registry
                // client: with one, the runtime's own pull checks the tag and the access.
                if creds.runtime_only() {
                    return self.pull(ask).await;
                }
                let resolved = retry(
                    core.settings.retries,
                    core.settings.backoff,
                    "resolve",
                    |e: &RegistryError| {
                        core.metrics.inc(
                            "cimage_pull_retries_total",
                            &[
                                ("registry", core.registry_label(image.registry())),
                                ("reason", e.reason()),
                            ],
                        )
                    },
                    || core.registry.resolve(image, creds.credentials.as_ref()),
                )
                .await;
                let resolved = match resolved {
                    Ok(r) => r,
                    // The registry is down, not refusing: serve the copy the node has, if the
                    // site said so, and say that it is unchecked.
                    Err(e)
                        if core.settings.use_cached_when_registry_down
                            && e.is_down()
                            && self
                                .may_use_unchecked(&cached_image, creds.fingerprint.as_deref())
                                .await =>
                    {
                        warn!(image = %name, "registry unreachable, serving the cached copy unchecked: {e}");
                        core.metrics.inc("cimage_stale_served_total", &[]);
                        return Ok(Outcome {
                            stale: true,
                            ..cached(cached_image, false)
                        });
                    }
                    Err(source) => {
                        return Err(PullError::Registry {
                            image: name.clone(),
                            source: Box::new(source),
                        })
                    }
                };
                if !policy::is_current(image, &cached_image.repo_digests, &resolved) {
                    return self.pull(ask).await;
                }
                // The HEAD ran with the request's credentials: it proved access.
                Ok(cached(cached_image, true))
            }
            Decision::UseCached(cached_image) => {
                let rec =
                    core.cache
                        .record_of(&cached_image.id)
                        .await
                        .map_err(|e| PullError::Index {
                            image: name.clone(),
                            source: Arc::new(e),
                        })?;
                let (credentialed, fps) = rec
                    .map(|r| (r.credentialed, r.fingerprints))
                    .unwrap_or((false, Vec::new()));
                // A public image needs nobody's credentials (and no helper run) to be used.
                if policy::access(credentialed, &fps, None, core.settings.verify)
                    == policy::Access::Granted
                {
                    return Ok(cached(cached_image, false));
                }
                let creds = self.credentials_of(ask).await?;
                if policy::access(
                    credentialed,
                    &fps,
                    creds.fingerprint.as_deref(),
                    core.settings.verify,
                ) == policy::Access::Granted
                {
                    return Ok(cached(cached_image, false));
                }
                let proven = match creds.runtime_only() {
                    true => Err(RegistryError::new(
                        image,
                        RegistryErrorKind::Unauthorized,
                        "not checked",
                        "an identity token is the runtime's to exchange",
                    )),
                    false => {
                        core.registry
                            .resolve(image, creds.credentials.as_ref())
                            .await
                    }
                };
                match proven {
                    Ok(_) => Ok(cached(cached_image, true)),
                    Err(e) if e.is_transient() || e.kind == RegistryErrorKind::Tls => {
                        Err(PullError::Registry {
                            image: name.clone(),
                            source: Box::new(e),
                        })
                    }
                    // Not proven: as if the image were absent.
                    Err(_) => match policy::decide(policy, image, None::<RuntimeImage>) {
                        Decision::NotPresent => Err(PullError::NotPresent {
                            image: name,
                            policy,
                        }),
                        _ => self.pull(ask).await,
                    },
                }
            }
        }
    }

    /// Whether this request may have the cached copy without the registry's word: the image is
    /// not private, or the request proved access before (the credential rule, unchanged when
    /// the registry is down).
    async fn may_use_unchecked(&self, cached: &RuntimeImage, fingerprint: Option<&str>) -> bool {
        let (credentialed, fps) = match self.core.cache.record_of(&cached.id).await {
            Ok(Some(r)) => (r.credentialed, r.fingerprints),
            Ok(None) => (false, Vec::new()),
            Err(_) => return false,
        };
        policy::access(credentialed, &fps, fingerprint, self.core.settings.verify)
            == policy::Access::Granted
    }

    /// Pulls through the shared flight and notes the result as present.
    async fn pull(&self, ask: &PullContext<'_>) -> Result<Outcome, PullError> {
        let creds = self.credentials_of(ask).await?;
        let pulled = self.pull_shared(ask, creds).await?;
        self.core.cache.remember(&pulled.image);
        Ok(Outcome {
            image: pulled.image,
            action: Action::Pulled,
            verified: false,
            stale: false,
            measured: pulled.measured,
            settle: Some(pulled.settle),
        })
    }
}

impl super::Resolved {
    /// The credentials are an OAuth2 refresh token, which only the runtime exchanges.
    fn runtime_only(&self) -> bool {
        self.credentials
            .as_ref()
            .is_some_and(|c| c.kind == SecretKind::IdentityToken)
    }
}
