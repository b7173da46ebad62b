//! The registry side: resolving a tag to its manifest digest with a HEAD request (cheap, and not
//! counted as a pull by Docker Hub), reading a manifest's layers and sizes before a pull, and
//! checking a blob's real length (HEAD), and reading big layer blobs in byte ranges for
//! cimage's own fetch, with cimage's own HTTP client (reqwest: a size cap, time limits,
//! `Retry-After`); oci-client does only the token step. The runtime pulls through CRI so that
//! the bytes land where containers need them; cimage's fetch only puts big blobs there first.
//!
//! This file owns the [`Registry`] trait and what crosses it (manifests, blobs, errors, a host's
//! settings); `client.rs` is the real implementation, `http.rs` its manifest requests,
//! `classify.rs` what their failures mean, `ranges.rs` the range reads of blobs, and `fake.rs` the double for unit tests.

mod classify;
mod client;
#[cfg(any(test, feature = "test-util"))]
pub mod fake;
mod http;
mod ranges;

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

pub use client::OciRegistry;

use crate::credentials::Credentials;
use crate::reference::ImageRef;

/// What kind of failure a registry request had; each is a distinct message and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryErrorKind {
    /// The repository or tag does not exist.
    NotFound,
    /// The credentials were refused or are needed.
    Unauthorized,
    /// The registry could not be reached (connection refused, DNS, timeout).
    Unreachable,
    /// TLS verification failed.
    Tls,
    /// The registry's token service (its `WWW-Authenticate: Bearer realm`) could not be reached.
    TokenService,
    /// The registry answered with a server error (5xx, 429); may pass.
    Server,
    /// Anything else (malformed answers).
    Other,
}

/// A failed registry request, naming the registry and the image.
#[derive(Debug, Clone, thiserror::Error)]
#[error("registry {registry}: {what} for {image}: {detail}")]
pub struct RegistryError {
    /// Registry host.
    pub registry: String,
    /// The image asked about.
    pub image: String,
    /// Classification.
    pub kind: RegistryErrorKind,
    /// Short description of the kind.
    pub what: &'static str,
    /// Details from the client (never credentials).
    pub detail: String,
    /// How long the registry asked to be left alone (`Retry-After` of a 429 or 503).
    pub retry_after: Option<Duration>,
}

impl RegistryError {
    /// An error about `image` at its registry (no `Retry-After`).
    pub fn new(
        image: &ImageRef,
        kind: RegistryErrorKind,
        what: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            registry: image.registry().to_owned(),
            image: image.to_string(),
            kind,
            what,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// The registry could not be reached or failed on its side (unreachable, its token
    /// service down, 5xx): not a refusal (401/403), not an absence (404), not a TLS mismatch.
    pub fn is_down(&self) -> bool {
        matches!(
            self.kind,
            RegistryErrorKind::Unreachable
                | RegistryErrorKind::TokenService
                | RegistryErrorKind::Server
        )
    }

    /// The `reason` label of metrics: `not_found`, `unauthorized`, `unreachable`, `tls`,
    /// `token_service`, `server` or `other`.
    pub fn reason(&self) -> &'static str {
        match self.kind {
            RegistryErrorKind::NotFound => "not_found",
            RegistryErrorKind::Unauthorized => "unauthorized",
            RegistryErrorKind::Unreachable => "unreachable",
            RegistryErrorKind::Tls => "tls",
            RegistryErrorKind::TokenService => "token_service",
            RegistryErrorKind::Server => "server",
            RegistryErrorKind::Other => "other",
        }
    }

    /// Whether a retry may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind,
            RegistryErrorKind::Unreachable
                | RegistryErrorKind::Server
                | RegistryErrorKind::TokenService
        )
    }
}

/// The parts of the OCI distribution API cimage needs.
#[async_trait]
pub trait Registry: Send + Sync {
    /// Resolves a reference to its manifest digest (`sha256:…`) with a HEAD request. For a
    /// multi-platform image this is the index digest, as the runtime records it.
    async fn resolve(
        &self,
        image: &ImageRef,
        credentials: Option<&Credentials>,
    ) -> Result<String, RegistryError>;

    /// The image's manifest for this host's platform: its config and layer blobs as stored
    /// (compressed). Their sum is the same measure the runtime reports for images; the layers
    /// are what a pull downloads. Read where the runtime pulls from: the first of the
    /// registry's mirrors that has it, else the registry.
    async fn manifest(
        &self,
        image: &ImageRef,
        credentials: Option<&Credentials>,
    ) -> Result<ImageManifest, RegistryError>;

    /// The length of blob `digest` of `image` as the registry serves it (a HEAD with the
    /// request's credentials, its `Content-Length`): a manifest's claimed sizes are checked
    /// against it before room is made for a pull.
    async fn blob_size(
        &self,
        image: &ImageRef,
        digest: &str,
        credentials: Option<&Credentials>,
    ) -> Result<u64, RegistryError>;
}

/// Reads layer blobs in byte ranges: cimage's own fetch of big layers, several connections
/// per blob, with the registry's credentials, mirrors and redirects as manifest requests have
/// them.
#[async_trait]
pub trait BlobSource: Send + Sync {
    /// Opens `blob` of `image` with a GET of its `first` byte range at the first host that has
    /// it (the registry's mirrors in order, then the registry), following redirects. The
    /// answer's body may be the whole blob instead (a registry that ignores ranges).
    async fn open(
        &self,
        image: &ImageRef,
        blob: &Blob,
        credentials: Option<&Credentials>,
        first: Range<u64>,
    ) -> Result<OpenBlob, RegistryError>;
}

/// A blob opened by [`BlobSource::open`]: its reader for the other ranges, and the first
/// answer's body.
pub struct OpenBlob {
    /// Reads further ranges from where the first read was led.
    pub reader: Arc<dyn RangeReader>,
    /// The first range (or the whole blob).
    pub first: BlobBody,
}

/// Further ranges of one opened blob.
#[async_trait]
pub trait RangeReader: Send + Sync {
    /// The host the blob is read from (a mirror or the registry), for messages.
    fn host(&self) -> &str;

    /// GETs the bytes `range` of the blob (`206`), or its whole body when the host ignores
    /// ranges (`200`, [`BlobBody::whole`]).
    async fn read(&self, range: Range<u64>) -> Result<BlobBody, RegistryError>;
}

/// The bytes of one answer, as they arrive.
pub struct BlobBody {
    /// The answer is the whole blob from its first byte (`200`), not the range asked for.
    pub whole: bool,
    /// Its chunks; an error ends it (the connection broke).
    pub chunks: BoxStream<'static, Result<Bytes, RegistryError>>,
}

/// One blob a manifest names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// `sha256:…`.
    pub digest: String,
    /// Bytes as stored (compressed).
    pub size: u64,
}

/// What a pull of an image downloads: its config and its layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageManifest {
    /// The image config blob.
    pub config: Blob,
    /// The layer blobs, bottom first.
    pub layers: Vec<Blob>,
}

impl ImageManifest {
    /// The config and the layers, each blob once (a manifest may list a layer many times),
    /// config first.
    pub fn distinct_blobs(&self) -> Vec<&Blob> {
        let mut seen = std::collections::HashSet::new();
        std::iter::once(&self.config)
            .chain(&self.layers)
            .filter(|b| seen.insert(b.digest.as_str()))
            .collect()
    }

    /// Config and layers: the image's size as the runtime counts it.
    pub fn size(&self) -> u64 {
        self.config.size + self.layer_bytes()
    }

    /// The layers' bytes: what a cold pull downloads, apart from the small config.
    pub fn layer_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

/// How cimage talks to one registry host (from `ImageCache.Registries.<host>`).
#[derive(Debug, Clone, Default)]
pub struct HostSettings {
    /// Plain HTTP instead of HTTPS (test and air-gapped setups only).
    pub insecure: bool,
    /// PEM file of a CA trusted for this host only, besides the system's roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// Mirror hosts tried in order, before this host, to resolve tags.
    pub mirrors: Vec<String>,
}

/// Why the registry side could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A host's `CaFile` could not be read.
    #[error("ImageCache.Registries.{host}.CaFile {}: {source}", path.display())]
    CaUnreadable {
        /// The registry host.
        host: String,
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A host's `CaFile` holds no PEM certificate.
    #[error("ImageCache.Registries.{host}.CaFile {} holds no PEM certificate", path.display())]
    CaNotPem {
        /// The registry host.
        host: String,
        /// The file.
        path: std::path::PathBuf,
    },
}
