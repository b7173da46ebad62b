//! Why an image could not be made ready ([`PullError`]): each failure names the image and what
//! was tried, and carries what a caller needs to decide (retry later, fix the request, outage).

use std::sync::Arc;

use crate::cache::CacheError;
use crate::credentials::CredentialError;
use crate::policy::PullPolicy;
use crate::reference::InvalidReference;
use crate::registry::RegistryError;
use crate::runtime::RuntimeError;

/// Why an image could not be made ready.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PullError {
    /// The reference is malformed; nothing was contacted.
    #[error(transparent)]
    InvalidReference(#[from] InvalidReference),
    /// An image id names no image on this node; ids are never pulled.
    #[error("image {id} is not present on this node (an image id names a local image; it is never pulled from a registry)")]
    LocalAbsent {
        /// The id as given.
        id: String,
    },
    /// The image is absent and the policy forbids pulling; nothing was contacted.
    #[error("image {image} is not present and pull policy is {policy}")]
    NotPresent {
        /// The normalised reference.
        image: String,
        /// The policy that forbade the pull.
        policy: PullPolicy,
    },
    /// The registry could not answer for the image.
    #[error("cannot check image {image} at its registry: {source}")]
    Registry {
        /// The normalised reference.
        image: String,
        /// The registry's error.
        source: Box<RegistryError>,
    },
    /// The runtime failed.
    #[error("{}", runtime_failure(image, what, source))]
    Runtime {
        /// The normalised reference.
        image: String,
        /// `pull`, `look up`.
        what: &'static str,
        /// The runtime's error.
        source: RuntimeError,
    },
    /// The download bytes stopped moving for `PullStallTimeout` on every attempt.
    #[error("pull of image {image} failed: no progress for {after} from {registry} (ImageCache.PullStallTimeout)")]
    Stalled {
        /// The normalised reference.
        image: String,
        /// The registry host that stopped sending.
        registry: String,
        /// The stall timeout, formatted (`2m0s`).
        after: String,
    },
    /// A blob cimage fetched itself did not match its digest, twice.
    #[error("pull of image {image} failed: {registry} served blob {digest} with bytes that do not match its digest, twice (a corrupting proxy or registry on the way)")]
    Corrupt {
        /// The normalised reference.
        image: String,
        /// The host that served the blob.
        registry: String,
        /// The blob's digest.
        digest: String,
    },
    /// The registry showed nothing (no manifest, no bytes) for `PullResolveTimeout`.
    #[error("pull of image {image} failed: {registry} {what} within {after} (ImageCache.PullResolveTimeout)")]
    Unresolved {
        /// The normalised reference.
        image: String,
        /// The registry host that sent nothing.
        registry: String,
        /// What it did not send (`sent no manifest`, `sent no layer bytes`, …).
        what: &'static str,
        /// The resolve timeout, formatted (`1m0s`).
        after: String,
    },
    /// The deadline passed.
    #[error("pull of image {image} did not finish within {after} (ImageCache.PullTimeout)")]
    Timeout {
        /// The normalised reference.
        image: String,
        /// The deadline, formatted.
        after: String,
    },
    /// The image does not fit without evicting pinned or in-use images.
    #[error("cannot pull image {image}: {source}")]
    NoRoom {
        /// The normalised reference.
        image: String,
        /// Why no room can be made (shared: one pull's error reaches every requester).
        source: Arc<CacheError>,
    },
    /// The node's credential sources failed (an unreadable auth file, a broken helper).
    #[error("cannot get the node's credentials for image {image}: {source}")]
    Credentials {
        /// The normalised reference.
        image: String,
        /// What failed (never a secret).
        source: CredentialError,
    },
    /// The daemon began shutting down while the pull ran; the runtime may finish it by itself.
    #[error("pull of image {image} stopped: cimaged is shutting down")]
    ShuttingDown {
        /// The normalised reference.
        image: String,
    },
    /// The index could not be read or could not record the use.
    #[error("image {image}: the index failed: {source}")]
    Index {
        /// The normalised reference.
        image: String,
        /// The index's error.
        source: Arc<CacheError>,
    },
}

impl PullError {
    /// The `reason` label of metrics: `invalid_reference`, `not_present`, `stalled`,
    /// `unresolved`, `corrupt`, `timeout`, `no_room`, `credentials`, `shutdown`, `index`, or the registry's or the
    /// runtime's own reason (`not_found`, `unauthorized`, `unreachable`, …).
    pub fn reason(&self) -> &'static str {
        match self {
            PullError::InvalidReference(_) => "invalid_reference",
            PullError::LocalAbsent { .. } | PullError::NotPresent { .. } => "not_present",
            PullError::Registry { source, .. } => source.reason(),
            PullError::Runtime { source, .. } => source.reason(),
            PullError::Stalled { .. } => "stalled",
            PullError::Corrupt { .. } => "corrupt",
            PullError::Unresolved { .. } => "unresolved",
            PullError::Timeout { .. } => "timeout",
            PullError::NoRoom { .. } => "no_room",
            PullError::Credentials { .. } => "credentials",
            PullError::ShuttingDown { .. } => "shutdown",
            PullError::Index { .. } => "index",
        }
    }
}

/// One line that leads with what happened, then the runtime's own words.
fn runtime_failure(image: &str, what: &str, e: &RuntimeError) -> String {
    use crate::runtime::RuntimeErrorKind::*;
    match e.kind {
        NotFound => format!("image {image} was not found at its registry ({e})"),
        Unauthorized => format!("the registry refused access to image {image} ({e})"),
        Unavailable => format!("cannot {what} image {image}: the runtime is not answering ({e})"),
        _ => format!("runtime failed to {what} image {image}: {e}"),
    }
}
