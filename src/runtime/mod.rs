//! The CRI ImageService as the domain sees it: a trait over the node's image store, which is the
//! cache of record. The real implementation is [`crate::cri::CriImageRuntime`]; unit tests use
//! `fake::FakeRuntime`.

use async_trait::async_trait;

use crate::credentials::Credentials;

/// One image as the runtime reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeImage {
    /// The runtime's image id (for containerd, the config digest).
    pub id: String,
    /// Tags that name it, e.g. `127.0.0.1:5000/app:1`.
    pub repo_tags: Vec<String>,
    /// Manifest digests that name it, e.g. `127.0.0.1:5000/app@sha256:…`.
    pub repo_digests: Vec<String>,
    /// Size in bytes as the runtime counts it.
    pub size: u64,
    /// The runtime's own pin flag (containerd 1.6 reports false for everything).
    pub pinned: bool,
}

/// Usage of the filesystem holding the runtime's images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFsUsage {
    /// Where the image filesystem is mounted.
    pub mountpoint: String,
    /// Bytes used by images.
    pub used_bytes: u64,
}

/// One blob the runtime is downloading right now (an in-flight ingest of containerd's content
/// store). It disappears once the blob is committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ingest {
    /// The blob's digest (`sha256:…`), as the manifest names it.
    pub digest: String,
    /// Bytes received so far.
    pub offset: u64,
    /// The blob's size, when the runtime knows it (0 otherwise).
    pub total: u64,
}

/// What kind of failure a runtime call had; decides retries and the caller's status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeErrorKind {
    /// The runtime socket is not answering (down, restarting); worth retrying.
    Unavailable,
    /// The image does not exist (in the runtime or at the registry).
    NotFound,
    /// The registry refused the credentials.
    Unauthorized,
    /// The call ran out of time.
    DeadlineExceeded,
    /// The runtime reached the registry but the pull failed for a reason that may pass
    /// (connection refused, 5xx, reset).
    Transient,
    /// Anything else.
    Other,
}

/// How often a runtime that does not answer at all (restarting) is tried again, by the pulls
/// and the steps waiting for it: polling a missing socket faster only burns CPU.
pub const OUTAGE_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// A failed runtime call: which call, what kind of failure, and the runtime's message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{op}: {message}")]
pub struct RuntimeError {
    /// The CRI call, e.g. `PullImage`.
    pub op: &'static str,
    /// Classification for retries and status codes.
    pub kind: RuntimeErrorKind,
    /// The runtime's own words (never contains credentials: CRI does not echo them).
    pub message: String,
}

impl RuntimeError {
    /// The `reason` label of metrics: `unavailable`, `not_found`, `unauthorized`, `timeout`,
    /// `transient` or `other`.
    pub fn reason(&self) -> &'static str {
        match self.kind {
            RuntimeErrorKind::Unavailable => "unavailable",
            RuntimeErrorKind::NotFound => "not_found",
            RuntimeErrorKind::Unauthorized => "unauthorized",
            RuntimeErrorKind::DeadlineExceeded => "timeout",
            RuntimeErrorKind::Transient => "transient",
            RuntimeErrorKind::Other => "other",
        }
    }

    /// Whether retrying the same call may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind,
            RuntimeErrorKind::Unavailable
                | RuntimeErrorKind::Transient
                | RuntimeErrorKind::DeadlineExceeded
        )
    }
}

/// The node's image store (CRI ImageService).
#[async_trait]
pub trait ImageRuntime: Send + Sync {
    /// Looks an image up by name, digest reference or id; `None` if the runtime does not have it.
    async fn image_status(&self, image: &str) -> Result<Option<RuntimeImage>, RuntimeError>;
    /// Pulls an image into the runtime and returns the runtime's image id.
    async fn pull_image(
        &self,
        image: &str,
        credentials: Option<&Credentials>,
    ) -> Result<String, RuntimeError>;
    /// Lists every image the runtime holds.
    async fn list_images(&self) -> Result<Vec<RuntimeImage>, RuntimeError>;
    /// Removes an image (by id or name). Removing an absent image is not an error.
    async fn remove_image(&self, image: &str) -> Result<(), RuntimeError>;
    /// Usage of the image filesystem(s); also serves as the runtime's health probe.
    async fn image_fs_info(&self) -> Result<Vec<ImageFsUsage>, RuntimeError>;
    /// The image the runtime uses for pod sandboxes, if it says; never evicted.
    async fn sandbox_image(&self) -> Result<Option<String>, RuntimeError>;
    /// The images of every container the runtime knows, in any state and whoever created it
    /// (ids and the names they were created by), as kubelet's image GC counts them.
    async fn images_in_use(&self) -> Result<Vec<String>, RuntimeError>;
    /// The downloads under way, with their bytes; `None` when the runtime cannot tell (CRI has
    /// no such call: containerd answers through its content service, CRI-O does not at all).
    async fn downloads(&self) -> Result<Option<Vec<Ingest>>, RuntimeError> {
        Ok(None)
    }
    /// Whether the runtime already holds blob `digest` (a layer shared with another image is
    /// not downloaded again); `None` when it cannot tell.
    async fn has_blob(&self, _digest: &str) -> Result<Option<bool>, RuntimeError> {
        Ok(None)
    }
    /// The size of blob `digest` as the runtime holds it (what it really takes, whatever a
    /// manifest claims); `None` when the runtime does not hold it or cannot tell.
    async fn blob_size(&self, _digest: &str) -> Result<Option<u64>, RuntimeError> {
        Ok(None)
    }
}

/// An in-memory runtime for unit tests: images appear when "pulled" from a fake registry table.
#[cfg(any(test, feature = "test-util"))]
pub mod fake {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    /// In-memory [`ImageRuntime`]. `available` plays the registry: reference → (id, digest).
    #[derive(Default)]
    pub struct FakeRuntime {
        /// Images the runtime holds.
        pub images: Mutex<Vec<RuntimeImage>>,
        /// What a pull of a reference yields: (image id, manifest digest, size).
        pub available: Mutex<HashMap<String, (String, String, u64)>>,
        /// Number of `pull_image` calls made.
        pub pulls: AtomicUsize,
        /// Errors to return from the next pulls, in order.
        pub pull_failures: Mutex<Vec<RuntimeError>>,
        /// How long a pull takes.
        pub pull_delay: Mutex<Duration>,
        /// Largest number of pulls seen running at once.
        pub max_parallel: AtomicUsize,
        /// What `sandbox_image` answers.
        pub sandbox: Mutex<Option<String>>,
        /// Images of containers created outside cimage (what ListContainers reports).
        pub container_images: Mutex<Vec<String>>,
        /// ListContainers fails.
        pub containers_unknown: std::sync::atomic::AtomicBool,
        /// What `downloads` answers (`None`: the runtime cannot tell, as CRI-O).
        pub ingests: Mutex<Option<Vec<Ingest>>>,
        /// Blobs `has_blob` reports as held.
        pub blobs: Mutex<Vec<String>>,
        /// What `blob_size` reports, by digest.
        pub blob_sizes: Mutex<HashMap<String, u64>>,
        /// Called with the reference at the start of each `pull_image` (a test looks at what
        /// else is true at that moment).
        #[allow(clippy::type_complexity)]
        pub on_pull: Mutex<Option<Box<dyn Fn(&str) + Send + Sync>>>,
        running: AtomicUsize,
    }

    impl FakeRuntime {
        /// Makes `reference` pullable, yielding image `id` with manifest `digest`.
        pub fn offer(&self, reference: &str, id: &str, digest: &str, size: u64) {
            self.available.lock().unwrap().insert(
                reference.to_owned(),
                (id.to_owned(), digest.to_owned(), size),
            );
        }

        fn matches(img: &RuntimeImage, name: &str) -> bool {
            img.id == name
                || img.repo_tags.iter().any(|t| t == name)
                || img.repo_digests.iter().any(|d| d == name)
        }
    }

    #[async_trait]
    impl ImageRuntime for FakeRuntime {
        async fn image_status(&self, image: &str) -> Result<Option<RuntimeImage>, RuntimeError> {
            let images = self.images.lock().unwrap();
            Ok(images.iter().find(|i| Self::matches(i, image)).cloned())
        }

        async fn pull_image(
            &self,
            image: &str,
            _credentials: Option<&Credentials>,
        ) -> Result<String, RuntimeError> {
            self.pulls.fetch_add(1, Ordering::SeqCst);
            if let Some(f) = self.on_pull.lock().unwrap().as_ref() {
                f(image);
            }
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_parallel.fetch_max(now, Ordering::SeqCst);
            let delay = *self.pull_delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            self.running.fetch_sub(1, Ordering::SeqCst);
            if let Some(e) = {
                let mut f = self.pull_failures.lock().unwrap();
                (!f.is_empty()).then(|| f.remove(0))
            } {
                return Err(e);
            }
            let (id, digest, size) =
                self.available
                    .lock()
                    .unwrap()
                    .get(image)
                    .cloned()
                    .ok_or(RuntimeError {
                        op: "PullImage",
                        kind: RuntimeErrorKind::NotFound,
                        message: format!("{image}: not found"),
                    })?;
            let name = image.split('@').next().unwrap();
            // Strip a tag only when the last ':' is after the last '/' (else it is a port).
            let repo = match (name.rfind(':'), name.rfind('/')) {
                (Some(c), Some(s)) if c > s => &name[..c],
                _ => name,
            };
            let mut images = self.images.lock().unwrap();
            // A tag moves: take it off whichever image had it.
            for i in images.iter_mut() {
                i.repo_tags.retain(|t| t != image);
            }
            match images.iter_mut().find(|i| i.id == id) {
                Some(i) => {
                    i.repo_tags.push(image.to_owned());
                    i.repo_digests.push(format!("{repo}@{digest}"));
                }
                None => images.push(RuntimeImage {
                    id: id.clone(),
                    repo_tags: if image.contains('@') {
                        vec![]
                    } else {
                        vec![image.to_owned()]
                    },
                    repo_digests: vec![format!("{repo}@{digest}")],
                    size,
                    pinned: false,
                }),
            }
            Ok(id)
        }

        async fn list_images(&self) -> Result<Vec<RuntimeImage>, RuntimeError> {
            Ok(self.images.lock().unwrap().clone())
        }

        async fn remove_image(&self, image: &str) -> Result<(), RuntimeError> {
            self.images
                .lock()
                .unwrap()
                .retain(|i| !Self::matches(i, image));
            Ok(())
        }

        async fn image_fs_info(&self) -> Result<Vec<ImageFsUsage>, RuntimeError> {
            let used = self.images.lock().unwrap().iter().map(|i| i.size).sum();
            Ok(vec![ImageFsUsage {
                mountpoint: "/".into(),
                used_bytes: used,
            }])
        }

        async fn sandbox_image(&self) -> Result<Option<String>, RuntimeError> {
            Ok(self.sandbox.lock().unwrap().clone())
        }
        async fn images_in_use(&self) -> Result<Vec<String>, RuntimeError> {
            match self.containers_unknown.load(Ordering::SeqCst) {
                true => Err(RuntimeError {
                    op: "ListContainers",
                    kind: RuntimeErrorKind::Unavailable,
                    message: "the runtime does not answer".into(),
                }),
                false => Ok(self.container_images.lock().unwrap().clone()),
            }
        }
        async fn downloads(&self) -> Result<Option<Vec<Ingest>>, RuntimeError> {
            Ok(self.ingests.lock().unwrap().clone())
        }
        async fn has_blob(&self, digest: &str) -> Result<Option<bool>, RuntimeError> {
            let known = self.ingests.lock().unwrap().is_some();
            Ok(known.then(|| self.blobs.lock().unwrap().iter().any(|b| b == digest)))
        }
        async fn blob_size(&self, digest: &str) -> Result<Option<u64>, RuntimeError> {
            Ok(self.blob_sizes.lock().unwrap().get(digest).copied())
        }
    }
}

pub mod content;
#[cfg(any(test, feature = "test-util"))]
pub mod fake_task;
pub mod task;
pub use content::{layer_ref, BlobTarget, BlobWriter, ContentStore};
pub use task::{
    ContainerInfo, ContainerSpec, ContainerState, ContainerStatus, Created, DeviceSpec, EtcCheck,
    ExecAttach, ExecEvent, ExecInput, ExecOutput, ExecSession, HostProcess, Landing, LandingError,
    MountSpec, PodInfo, PodSpec, ProcessIdentity, Resources, RuntimeVersion, SpecMount,
    TaskRuntime,
};
