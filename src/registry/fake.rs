//! A scripted [`Registry`](super::Registry) for unit tests (and other crates' tests, with the
//! `test-util` feature): digests and sizes from tables, a switch that takes it down, counts.

use async_trait::async_trait;

use super::{Blob, ImageManifest, Registry, RegistryError, RegistryErrorKind};
use crate::credentials::Credentials;
use crate::reference::ImageRef;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Answers `resolve` from a table of reference → digest; counts calls.
#[derive(Default)]
pub struct FakeRegistry {
    /// reference (normalised string) → manifest digest.
    pub digests: Mutex<HashMap<String, String>>,
    /// When set, every request fails as unreachable.
    pub down: std::sync::atomic::AtomicBool,
    /// Number of `resolve` calls.
    pub resolves: AtomicUsize,
    /// reference → size, for `manifest` (one layer of that size, an empty config).
    pub sizes: Mutex<HashMap<String, u64>>,
    /// Number of `manifest` calls.
    pub size_checks: AtomicUsize,
    /// References whose requests are never answered (a registry that accepts and hangs).
    pub silent: Mutex<std::collections::HashSet<String>>,
    /// What a blob's HEAD says its length is, by digest (absent: not found).
    pub blob_lengths: Mutex<HashMap<String, u64>>,
    /// Number of `blob_size` calls.
    pub blob_heads: AtomicUsize,
    /// reference → the manifest `manifest` answers, instead of one built from `sizes`.
    pub manifests: Mutex<HashMap<String, ImageManifest>>,
}

impl FakeRegistry {
    /// Never answers requests about `image` while it is silent.
    async fn hang_if_silent(&self, image: &ImageRef) {
        if self.silent.lock().unwrap().contains(&image.to_string()) {
            std::future::pending::<()>().await;
        }
    }

    /// Sets what `reference` resolves to.
    pub fn set(&self, reference: &str, digest: &str) {
        self.digests
            .lock()
            .unwrap()
            .insert(reference.to_owned(), digest.to_owned());
    }
}

#[async_trait]
impl Registry for FakeRegistry {
    async fn resolve(
        &self,
        image: &ImageRef,
        _credentials: Option<&Credentials>,
    ) -> Result<String, RegistryError> {
        self.resolves.fetch_add(1, Ordering::SeqCst);
        self.hang_if_silent(image).await;
        let err = |kind, what| RegistryError::new(image, kind, what, "fake");
        if self.down.load(Ordering::SeqCst) {
            return Err(err(RegistryErrorKind::Unreachable, "unreachable"));
        }
        self.digests
            .lock()
            .unwrap()
            .get(&image.to_string())
            .cloned()
            .ok_or_else(|| err(RegistryErrorKind::NotFound, "repository or tag not found"))
    }

    async fn manifest(
        &self,
        image: &ImageRef,
        _credentials: Option<&Credentials>,
    ) -> Result<ImageManifest, RegistryError> {
        self.size_checks.fetch_add(1, Ordering::SeqCst);
        self.hang_if_silent(image).await;
        if let Some(m) = self.manifests.lock().unwrap().get(&image.to_string()) {
            return Ok(m.clone());
        }
        self.sizes
            .lock()
            .unwrap()
            .get(&image.to_string())
            .map(|&size| ImageManifest {
                config: Blob {
                    digest: format!("sha256:{:064x}", 0),
                    size: 0,
                },
                layers: vec![Blob {
                    digest: format!("sha256:{:064x}", size),
                    size,
                }],
            })
            .ok_or_else(|| {
                RegistryError::new(
                    image,
                    RegistryErrorKind::NotFound,
                    "repository or tag not found",
                    "fake",
                )
            })
    }

    async fn blob_size(
        &self,
        image: &ImageRef,
        digest: &str,
        _credentials: Option<&Credentials>,
    ) -> Result<u64, RegistryError> {
        self.blob_heads.fetch_add(1, Ordering::SeqCst);
        self.hang_if_silent(image).await;
        self.blob_lengths
            .lock()
            .unwrap()
            .get(digest)
            .copied()
            .ok_or_else(|| {
                RegistryError::new(image, RegistryErrorKind::NotFound, "blob unknown", "fake")
            })
    }
}
